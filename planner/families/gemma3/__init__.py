"""The gemma3 family (model_type gemma3): its parts, registered in planner/families/__init__.py."""
