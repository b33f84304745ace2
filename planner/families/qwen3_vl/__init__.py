"""The qwen3_vl family (model_type qwen3_vl): its parts, registered in planner/families/__init__.py."""
