"""blsp.training"""
