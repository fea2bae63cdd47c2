"""HTTP layer: middleware, dependencies and routes."""
