print("swiftnbd")
