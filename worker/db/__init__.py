"""Records: endpoints, deliveries, attempts (SQLAlchemy Core, async)."""
