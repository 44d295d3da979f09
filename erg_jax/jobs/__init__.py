"""The jobs: what the launchers call, built on the library beside it.

The sampling job (``job``: its checks and plan in ``job_setup``, model and condition
loading in ``job_loading``, preemption-safe files in ``output``, the dry run in
``dry_run``, the persistent compile cache in ``compile_cache``), training (``train``),
the quality bench (``quality``), the speed benchmark (``benchmark`` on ``speed``), the
quickstart (``quickstart``) and the HTML report (``report``). Nothing in the library (energy,
control, guidance, schedules, samplers, predictions, models, convert) imports from here.
"""
