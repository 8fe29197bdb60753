"""Puts lightning_vdnn's config groups on every Hydra app's search path, once the package is installed.

A user's own config can then say ``defaults: [strategy: vdnn_all]`` with no ``hydra.searchpath`` line. Their
own groups come first: a user's ``strategy/vdnn_all.yaml`` overrides ours.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

#: Where the package's groups (strategy/, model/, data/, trainer/) live.
SEARCH_PATH = "pkg://lightning_vdnn.conf"


class LightningVDNNSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # The strategy files' defaults name ``vdnn_schema`` from Hydra's ConfigStore, which Hydra copies before
        # it reads any file: the schema must be registered now, not when the files' package is first imported.
        import lightning_vdnn.conf  # noqa: F401  (registers the strategy schemas, strategy/*_schema)

        search_path.append(provider="lightning_vdnn", path=SEARCH_PATH)
