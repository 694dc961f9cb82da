import sys

from corral.gui.app import main

sys.exit(main())
