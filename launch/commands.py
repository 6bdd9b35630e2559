"""The CLI's command table: name -> (config dataclass, run function, help), as lazy ``module:attr`` strings so that
``distillset --help`` does not import torch. A stage adds a command by adding one line here; the CLI derives flags
from the config dataclass. Multi-word names (``prior train``) are typed as two words.
"""

from __future__ import annotations

import importlib

COMMANDS: dict[str, tuple[str, str, str]] = {
    "squeeze": ("distillset.squeeze.train:SqueezeConfig", "distillset.squeeze.train:run",
                 "train a backbone on a source"),
    "squeeze stats": ("distillset.squeeze.statistics:StatsConfig", "distillset.squeeze.statistics:run",
                       "real-data feature statistics"),
    "squeeze trajectories": ("distillset.squeeze.trajectories:TrajectoryConfig", "distillset.squeeze.trajectories:run",
                              "MTT experts"),
    "recover": ("distillset.recover.config:RecoverConfig", "distillset.recover.engine:run",
                 "synthesise a distilled set"),
    "relabel": ("distillset.relabel.softlabels:RelabelConfig", "distillset.relabel.softlabels:run",
                 "store FKD-style soft labels"),
    "evaluate": ("distillset.relabel.evaluate:EvaluateConfig", "distillset.relabel.evaluate:run",
                  "train students, report top-1"),
    "export": ("distillset.launch.export:ExportConfig", "distillset.launch.export:run", "export a distilled set"),
    "shards": ("distillset.launch.shards:ShardsConfig", "distillset.launch.shards:run",
                "write a source as webdataset shards"),
    "shards index": ("distillset.launch.shards:ShardsIndexConfig", "distillset.launch.shards:run_index",
                      "per-class index of webdataset shards (read one class without the others)"),
    "privacy mia": ("distillset.launch.privacy:MIAConfig", "distillset.launch.privacy:run_mia",
                     "membership inference on models trained on members, distilled sets and coresets"),
    "privacy nearest": ("distillset.launch.privacy:NearestConfig", "distillset.launch.privacy:run_nearest",
                         "nearest training images of each synthetic image (L2, SSIM, features)"),
    "explain": ("distillset.relabel.explain:ExplainConfig", "distillset.relabel.explain:run",
                "integrated gradients against standard and distilled baselines, faithfulness measured"),
    "attack leak": ("distillset.launch.leak:LeakConfig", "distillset.launch.leak:run",
                    "gradient leakage: reconstruct private images from a shared gradient (DLG, iDLG)"),
    "attack backdoor": ("distillset.launch.backdoor:BackdoorConfig", "distillset.launch.backdoor:run",
                         "NAIVEATTACK / DOORPING backdoors vs a clean distilled set"),
    "federated": ("distillset.launch.federated:FederatedConfig", "distillset.launch.fed_apps:run",
                   "federated learning through distilled data (FedDM) vs FedAvg on Flower"),
    "vl train": ("distillset.launch.vl:VLTrainConfig", "distillset.launch.vl:run_train",
                 "image-caption pairs: BPE tokenizer, CLIP-style model, head experts"),
    "vl distill": ("distillset.launch.vl:VLDistillConfig", "distillset.launch.vl:run_distill",
                   "distil image-text pairs by bi-trajectory matching"),
    "vl evaluate": ("distillset.launch.vl:VLEvaluateConfig", "distillset.launch.vl:run_evaluate",
                    "retrieval recall of distilled pairs vs random, herding, k-center and full data"),
    "vl export": ("distillset.launch.vl:VLExportConfig", "distillset.launch.vl:run_export",
                  "distilled pairs as webdataset shards or a Hugging Face dataset"),
    "prior train": ("distillset.generative.train:PriorTrainConfig", "distillset.generative.train:run",
                     "train a small generative prior"),
}


def load(target: str):
    """The object a lazy ``module:attr`` string names (imported on first use)."""
    mod, _, attr = target.partition(":")
    return getattr(importlib.import_module(mod), attr)
