"""blsp.serving"""
