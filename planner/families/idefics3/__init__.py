"""The idefics3 family (model_type idefics3, smolvlm): its parts, registered in planner/families/__init__.py."""
