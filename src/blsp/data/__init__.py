"""blsp.data"""
