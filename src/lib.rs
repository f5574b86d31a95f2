//! cachalot: a pull-through caching proxy and mirror for OCI container registries.
