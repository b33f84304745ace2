"""The phi3_v family (model_type phi3_v): its parts, registered in planner/families/__init__.py."""
