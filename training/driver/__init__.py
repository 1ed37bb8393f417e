"""Code that runs in the notebook or driver process: widgets, the launch plan, starting launchers, Spark, set-up.

Nothing here runs on a training rank. ``env_setup`` must import only the standard library (it runs before any install).
"""
