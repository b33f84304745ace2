"""The internvl family (model_type internvl): its parts, registered in planner/families/__init__.py."""
