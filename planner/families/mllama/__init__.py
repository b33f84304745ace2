"""The mllama family (model_type mllama): its parts, registered in planner/families/__init__.py."""
