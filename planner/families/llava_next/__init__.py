"""The llava_next family (model_type llava_next): its parts, registered in planner/families/__init__.py."""
