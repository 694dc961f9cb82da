"""Pure planning: where each layer goes and how much memory each device needs."""
