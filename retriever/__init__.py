"""GSU retriever: cosine top-K + SimTier kernels (``kernels``), the device cache with asynchronous
prefetch (``cache``), the Milvus filtered-search path (``milvus_search``) and the Python client
(``client.Retriever``), the gRPC service ``muse serve`` (``service``, ``gsu.proto``) and its client
(``remote.RemoteRetriever``). Submodules are imported on demand so that importing the package is cheap."""
