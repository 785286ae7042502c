"""senior"""
