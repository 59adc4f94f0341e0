"""The compile driver: source → reference → pipeline → verification → engine → profile → output folder.

``prune2deploy.api`` is the façade users call; this package does the work behind ``api.compile``.
"""
