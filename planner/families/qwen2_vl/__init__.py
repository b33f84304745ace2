"""The qwen2_vl family (model_type qwen2_vl): its parts, registered in planner/families/__init__.py."""
