"""What travels with a saved model: its instruction pipeline (copied beside the weights with ``consts.py`` and
``prompts.py``, so these three import nothing else from the project), its MLflow wrapper and its model card."""
