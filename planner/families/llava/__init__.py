"""The llava family (model_type llava): its parts, registered in planner/families/__init__.py."""
