"""The CLI's command table: name -> (config dataclass, run function, help), as lazy ``module:attr`` strings so that
``distillset --help`` does not import torch. A stage adds a command by adding one line here; the CLI derives flags
from the config dataclass. Multi-word names (``prior train``) are typed as two words.
"""

from __future__ import annotations

COMMANDS: dict[str, tuple[str, str, str]] = {
    "squeeze": ("squeeze.train:SqueezeConfig", "squeeze.train:run", "train a backbone on a source"),
    "squeeze stats": ("squeeze.statistics:StatsConfig", "squeeze.statistics:run", "real-data feature statistics"),
    "squeeze trajectories": ("squeeze.trajectories:TrajectoryConfig", "squeeze.trajectories:run", "MTT experts"),
    "recover": ("recover.config:RecoverConfig", "recover.engine:run", "synthesise a distilled set"),
    "relabel": ("relabel.softlabels:RelabelConfig", "relabel.softlabels:run", "store FKD-style soft labels"),
    "evaluate": ("relabel.evaluate:EvaluateConfig", "relabel.evaluate:run", "train students, report top-1"),
    "export": ("launch.export:ExportConfig", "launch.export:run", "export a distilled set"),
    "shards": ("launch.shards:ShardsConfig", "launch.shards:run", "write a source as webdataset shards"),
    "prior train": ("generative.train:PriorTrainConfig", "generative.train:run", "train a small generative prior"),
}
