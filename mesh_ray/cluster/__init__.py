"""The Ray cluster as mesh-ray sees it: joining it (``connect``, ``access``), what it has and where
actors go (``resources``), what runs where (``status``), Ray's errors as ours (``ray_errors``), and
Prometheus metrics (``metrics``).  Nothing here knows about models."""
