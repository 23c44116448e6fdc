"""placeholder"""


class WormTimeSeries:
    pass
