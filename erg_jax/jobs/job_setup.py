"""Turns a sampling-job config into a Plan: checked settings, mesh, models, guiders.

All config errors are raised here, naming the field, before any weights load or any
program compiles: an unknown method, a missing checkpoint folder, a batch the data
axes do not divide, a workdir made by another config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from erg_jax import guidance as G
from erg_jax.conditioning import ClassConditions, parse_classes
from erg_jax.guidance.guider import check_layers
from erg_jax.jobs import output
from erg_jax.models import registry
from erg_jax.pipeline import Pipeline


@dataclasses.dataclass
class Plan:
    """Everything a sampling job needs, built and checked: the Pipeline (the models, the
    sampler, the mesh) and what the job adds.

    Legend: methods: name -> guider, every method and sweep value; conditions.slots(
    indices, tau_c) -> condition slots of the config's prompts or classes; conversions:
    per part converted from model.pretrained, "converted" now or "reused".
    """

    pipeline: Pipeline
    config_dict: dict
    seed: int
    num_samples: int
    methods: dict
    conditions: Any
    progress: bool
    grid_size: int
    conversions: dict

    @property
    def batch_size(self) -> int:
        return self.pipeline.batch_size


def make_methods(config, *, text: bool) -> dict:
    """Method name -> guider, one per method and sweep value (guidance.sweep='scale=2,3'),
    each built by ``guidance.make_guiders`` from the config's guidance section."""
    guiders = G.guiders_from_section(config.guidance)
    G.check_text_guiders(guiders, text=text, kind=config.model.kind)
    return guiders


def build_plan(config, workdir: str) -> Plan:
    """Checks a job config and builds its Plan (see module docstring)."""
    cfg = config.to_dict()
    if config.output.num_samples < 1:
        raise ValueError(f"output.num_samples must be >= 1, got {config.output.num_samples}")
    text = registry.get(config.model.kind).text
    methods = make_methods(config, text=text)
    output.check_workdir(workdir, cfg)
    pipe = Pipeline.from_settings(config, workdir=workdir)  # checks its settings first
    # block names resolved on the model's layout, ids past its depth named, before compiling
    methods = {m: G.resolve_targets(g, pipe.layout) for m, g in methods.items()}
    for guider in methods.values():
        check_layers(guider, pipe.num_layers)
    if text:
        # one tempered encoding per C-ERG temperature the methods ask for
        conditions = pipe.encode(tau_cs=sorted({G.tempered_tau_c(g) for g in methods.values()}))
        pipe.drop_text_encoders()  # the prompts are encoded: give the device memory back
    else:
        ncls = pipe.num_classes
        classes = parse_classes(config.conditioning.classes, ncls) if ncls else None
        conditions = ClassConditions(ncls, classes)
    return Plan(
        pipeline=pipe,
        config_dict=cfg,
        seed=config.seed,
        num_samples=config.output.num_samples,
        methods=methods,
        conditions=conditions,
        progress=bool(config.output.progress),
        grid_size=int(config.output.grid_size),
        conversions=dict(pipe.sources.conversions),
    )
