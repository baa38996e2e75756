"""deit-lt: DeiT-LT -- vision transformers trained from scratch on long-tailed data by distilling from a CNN teacher."""
__version__ = '0.1.0'
