"""blsp.behaviors"""
