"""Clustering for TMGF/O2CAP: exact k-NN (``knn``), sparse k-reciprocal Jaccard (``jaccard``), DBSCAN on
the eps-edges (``dbscan``), the whole pipeline (``pipeline.jaccard_dbscan``), the row exchanges that shard
every stage over the ranks (``shard``, docs/clustering.md), camera-aware proxies
(``proxies``) and the dense restatement of the official code the tests compare with (``reference``)."""
