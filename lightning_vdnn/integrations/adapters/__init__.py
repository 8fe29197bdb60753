"""Every use of another library's private state, one module per library, each naming the version it was
written against; ``tests/test_adapters.py`` fails loudly when one of them changes. Everything else in
``lightning_vdnn`` uses the libraries' public hooks only."""
