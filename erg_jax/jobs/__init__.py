"""The jobs: what the launchers call, built on the library beside it.

The sampling job (``job``: an ``erg_jax.Pipeline`` plus its checks and plan in
``job_setup``, preemption-safe files in ``output``, the dry run in
``dry_run``, the persistent compile cache in ``compile_cache``), training (``train``),
the quality bench (``quality``), the speed benchmark (``benchmark`` on ``speed``), the
quickstart (``quickstart``) and the HTML report (``report``). Nothing in the library (energy,
control, guidance, schedules, samplers, predictions, models, convert, loading, pipeline)
imports from here.
"""
