"""Storage (paths and URIs), atomic writes, folder locks and leases, the chunk cache, settings, errors."""
