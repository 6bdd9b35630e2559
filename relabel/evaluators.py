"""The registry of evaluators: measurements ``distillset evaluate`` takes of a distilled set beside the students'
accuracy (which every evaluation reports). Each is a function ``(plan, cfg, rt) -> dict`` whose result is stored in
``metrics.json`` under its name; ``EvaluateConfig.evaluators`` names the ones to run. Third parties join through
the entry-point group ``distillset.evaluators`` (membership inference, backdoor success, retrieval recall and
attribution faithfulness are evaluators of this kind).
"""

from __future__ import annotations

from distillset.core.registry import Registry

EVALUATORS = Registry("evaluator", "distillset.evaluators", ("distillset.relabel.evaluate",
                                                             "distillset.relabel.privacy"))
register_evaluator = EVALUATORS.register
