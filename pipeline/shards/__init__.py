"""Shards: the format (`format`), reading a complete split (`splits`), raw dataset readers (`sources`),
the shard job (`job`, planned by `plan`, writing through `storage`: a folder or s3://), and the
node-local verified copy of s3:// splits (`cache`, private folders: `cachedir`). Loading shards for
training and evaluation (DALI, augmentation, crops, sampling, the corrupt-image scan) is in
`pipeline.data`.
"""
