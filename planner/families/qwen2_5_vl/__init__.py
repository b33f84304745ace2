"""The qwen2_5_vl family (model_type qwen2_5_vl): its parts, registered in planner/families/__init__.py."""
