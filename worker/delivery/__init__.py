"""The asyncio delivery engine: pure policy modules plus the I/O that uses them."""
