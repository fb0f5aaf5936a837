"""Multi-stage pipelines over the stage engines: `sendvae demo` (the whole job on the embedded example)
and `sendvae study` (the alignment variants compared on generation).

    from sendvae.pipeline.demo import run_demo
    from sendvae.pipeline.demo_config import demo_config

    report = run_demo(demo_config("cpu"), "runs/demo")   # -> runs/demo/report.html, report.md
"""
