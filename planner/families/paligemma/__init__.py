"""The paligemma family (model_type paligemma): its parts, registered in planner/families/__init__.py."""
