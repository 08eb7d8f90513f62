"""The serving core: one loaded model serves many callers at once.

    request.py      GenerationSettings, Request, RequestHandle, RequestStats, TextStream, errors
    scheduler.py    Scheduler: one thread per model runs every graph call; continuous batching
    image_cache.py  FeatureCache: image features by pixel hash, LRU bounded in bytes

PaliGemma (engine/model.py) holds the shared read-only state and submits every request here;
callers use PaliGemma.generate / submit and the task helpers, from any number of threads.
"""
from .image_cache import FeatureCache, image_key
from .request import (GenerationSettings, QueueFullError, Request, RequestHandle, RequestStats, SchedulerClosed,
                      StepTimes, TextStream)
from .scheduler import Scheduler, SchedulerConfig, SchedulerState

__all__ = ["FeatureCache", "GenerationSettings", "QueueFullError", "Request", "RequestHandle", "RequestStats",
           "Scheduler", "SchedulerClosed", "SchedulerConfig", "SchedulerState", "StepTimes", "TextStream",
           "image_key"]
