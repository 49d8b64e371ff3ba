"""blsp.inference"""
