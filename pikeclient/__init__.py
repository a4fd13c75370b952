from pikeclient.client import BaseLLMClient
