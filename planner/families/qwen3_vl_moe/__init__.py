"""The qwen3_vl_moe family (model_type qwen3_vl_moe): its parts, registered in planner/families/__init__.py."""
