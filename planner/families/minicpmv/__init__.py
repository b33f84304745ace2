"""The minicpmv family (model_type minicpmv): its parts, registered in planner/families/__init__.py."""
