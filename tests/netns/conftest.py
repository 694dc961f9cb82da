"""Three hosts on a bridge (network namespaces); skips with the reason when that is impossible."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.netns import Lan, LanUnavailable


@pytest.fixture()
def lan() -> Iterator[Lan]:
    try:
        with Lan(3) as built:
            yield built
    except LanUnavailable as exc:
        pytest.skip(str(exc))
