"""
``twistd -ny loghandler.tac``: the same service as ``twistd loghandler``, configured
from the environment alone.
"""

from twisted.application.service import Application

from loghandler.tap import Options, makeService

options = Options()
options.parseOptions([])
application = Application("loghandler")
makeService(options).setServiceParent(application)
