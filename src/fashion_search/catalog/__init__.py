"""Product catalogs: per-item metadata, filter expressions over it and grouping of images into products."""
