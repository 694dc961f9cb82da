"""corral-agent: the headless daemon on each worker host (control server, inventory, RPC worker)."""
