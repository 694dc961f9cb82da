"""corral.engine: everything that plans and runs the distributed model. Never imports Qt."""
