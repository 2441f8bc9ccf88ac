from tests.threads import one_torch_thread  # noqa: F401  (autouse: tiny forwards run single-threaded)
