"""blsp.evaluation"""
