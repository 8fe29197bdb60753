"""The demo models, data and LightningModules the recipes, benchmarks and tests use; not the library."""
