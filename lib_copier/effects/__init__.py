"""Image -> image effects that turn an original into a processed image: a registry of named, typed effects."""
